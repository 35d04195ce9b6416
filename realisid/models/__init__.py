"""Backbone loading, identity encoders and projector, the local and global ControlNet branches."""
