"""Operating the engine: the admin listener, the operations API, users and roles, PHI masking, support views, replay."""
