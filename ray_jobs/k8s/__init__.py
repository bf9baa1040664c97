"""Kubernetes side of ctssl: the objects a study needs (shared contract with the Helm chart) and
the ``ctssl k8s`` client (submit / status / logs / cancel)."""
