"""Protection of the shipped model: AES-256-GCM at rest and CKKS homomorphic inference."""
