"""The versioned store: layout, manifests, atomic publish, token files. Never imports Prefect."""
