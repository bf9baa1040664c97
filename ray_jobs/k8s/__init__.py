"""Kubernetes side of ctssl: the ``ctssl k8s`` client that follows the study RayJobs the Helm chart
creates (status / logs / cancel). The chart is the only definition of the objects."""
