"""Generation: the engine, its cache slots and the sampler, for every family."""
