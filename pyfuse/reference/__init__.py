"""Plain-torch reference implementations: the specification every backend is tested against."""
