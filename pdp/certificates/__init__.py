"""Client certificates: PEM, trust bundles and chain validation, identity, SPIFFE IDs, revocation."""
