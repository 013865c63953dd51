"""Tests of domainclip.domains.remote_sensing (fake data from make_fake_data.py)."""
