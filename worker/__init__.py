"""midimatch: worker package."""
