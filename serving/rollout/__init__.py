"""A model version's rollout: typed records, the pure judges, the live figures and the deployer's state machine."""
