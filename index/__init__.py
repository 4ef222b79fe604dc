"""midimatch: index package."""
