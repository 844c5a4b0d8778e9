"""edgetwin mappers: the mapper SDK (:mod:`mappers.sdk`) and the mappers shipped with
edgetwin, each in its own folder. A mapper imports only the SDK, never the gateway; the
gateway finds mappers through the ``edgetwin.mappers`` entry point group."""
