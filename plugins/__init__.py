"""cfkit's built-in plugins, registered through the ``cfkit`` entry-point group."""
