"""The test suite; its folders mirror the packages (tests/<package>/<stage>/)."""
