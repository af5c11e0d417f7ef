"""Jobs that orchestrate services: evolve, collect, train from recorded data, evaluate, DAgger, the main job."""
