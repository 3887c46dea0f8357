"""Backend implementations; see fastassoc._backend for how one is chosen."""
