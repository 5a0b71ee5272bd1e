"""Tests of fusion_trainer."""
