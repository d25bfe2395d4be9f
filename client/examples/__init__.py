"""Example Flower ClientApps that a site can host with ``client.flower_host``."""
