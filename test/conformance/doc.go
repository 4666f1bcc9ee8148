// Package conformance runs the OCI distribution conformance suite, pull only,
// against coop's peer server. The test is behind the integration build tag
// and needs the suite's binary in $COOP_BIN (make tools builds it); this file
// keeps the package buildable, and vettable, without the tag.
package conformance
