"""A real Kubernetes control plane on one machine, for Kiln's tests and demo (dev only).

etcd, kube-apiserver, kube-controller-manager and kube-scheduler built from Go
modules (build.sh), plus a node agent that runs bound pods as local processes.
Nothing in the operator or the runtime imports this package.
"""
