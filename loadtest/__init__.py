"""Load and capacity tooling for tidings: `loadtest.bench` (speed) and the Locust capacity runs."""
