"""HTTP front ends: thin routes over `service.engine`."""
