"""The twin: a cycle-level model of the CIM macro and its controller, served over a pty or TCP."""
