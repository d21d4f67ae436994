"""DeepSpeed's layout code, vendored as a test oracle (Apache-2.0, see LICENSE)."""
