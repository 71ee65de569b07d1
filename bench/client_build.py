"""Build kiln-loadgen (bench/loadgen) for this machine and print its path: `bash bench/run.sh client_build`."""

from bench.client import loadgen

if __name__ == "__main__":
    print(loadgen())
