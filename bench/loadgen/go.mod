module kiln/bench/loadgen

go 1.22
