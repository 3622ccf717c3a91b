"""Access tokens and what binds them: JOSE/JWS/JWKS, RFC 9068, RFC 7638, RFC 8705, DPoP (RFC 9449),
opaque tokens and the introspection client (RFC 7662), and the RFC 6750 challenge."""
