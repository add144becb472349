"""The test project's URLs."""

from __future__ import annotations

from django.urls import path

from django_tests.shop.views import order

urlpatterns = [path("order/", order)]
