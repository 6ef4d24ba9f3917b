"""Configuration: /etc/pcocc (system) and ~/.pcocc (user), parsed once into typed models."""
