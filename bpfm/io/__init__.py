"""The process's contact with the outside world: URIs and object storage (`storage`), files
published atomically (`atomic`), secrets kept out of every line (`redact`), full disks (`disk`),
scratch folders of dead processes (`scratch`), Ctrl-C and SIGTERM (`interrupts`), reading
ahead in a background thread (`ahead`)."""
