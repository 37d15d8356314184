"""``fedlite report``: the paper's comparisons (unimodal, late fusion, fusion layer, pooled against
federated), robustness and explanation quality, built from reusable runs into one page."""
