"""A tiny Django app for the tests: orders, and a view that mails about them."""
