"""CPU latency, throughput and memory benchmarks."""
