"""midimatch: model package."""
