"""Package data of the run gallery (``flows.gallery``): the page template, its script and style, and
three.js (``three/``, vendored, MIT; see ``three/VENDORED.md``)."""
