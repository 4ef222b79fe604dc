"""midimatch: server package."""
