"""cascade-scheduler: the gRPC service clients call; it routes requests over cascade-workers."""
