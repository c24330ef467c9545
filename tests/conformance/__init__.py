"""RFC 6455 conformance tooling (Autobahn|Testsuite under Python 2.7): see autobahn.py."""
