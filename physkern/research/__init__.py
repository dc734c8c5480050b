"""Research code: methods measured here before they join the production path (not exported)."""
