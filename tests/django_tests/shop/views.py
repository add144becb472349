"""A view that records an order and mails a confirmation, in the request's transaction."""

from __future__ import annotations

from django.core.mail import send_mail
from django.http import HttpRequest, HttpResponse

from django_tests.shop.models import Order


def order(request: HttpRequest) -> HttpResponse:
    email = request.POST["email"]
    Order.objects.create(email=email)
    send_mail("Your order", f"Thank you, {email}.", None, [email])
    if request.POST.get("fail"):
        raise RuntimeError("payment service down")
    return HttpResponse("ordered")
