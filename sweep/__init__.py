"""circuit-sweep's service layer: Ray Tune orchestration, storage, results and the CLI."""
