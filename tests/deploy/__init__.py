"""Tests of the deployment files: images, Compose, Prometheus, Grafana, Kubernetes."""
