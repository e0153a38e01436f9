"""Operating the daemon: the command line, the composition root (``daemon``), the
read-only database inspector (``admin``) and the systemd notify protocol."""
