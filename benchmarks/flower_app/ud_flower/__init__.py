"""FedAvg with Flower over unify-dist's own owners' shares and model: the Flower side of `make bench-links`."""
