"""Model files on disk: the repository's layout (repository.py) and how one version is read and
validated, bounded and off the loop (loading.py); the format itself is service/model.py."""
