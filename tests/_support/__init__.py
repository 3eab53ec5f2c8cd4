"""What many test modules share: value assertions (:mod:`tests._support.assertions`)."""
