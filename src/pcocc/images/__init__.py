"""VM images: repositories of immutable qcow2 layers, URIs and revisions."""
