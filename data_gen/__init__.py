"""Teacher-driven dataset generation: Self-Instruct, chain-of-thought rationales, Lion."""
