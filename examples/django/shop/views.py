"""The view: its mail is queued when the request's transaction commits."""

from django.core.mail import send_mail
from django.http import HttpRequest, HttpResponse


def signup(request: HttpRequest) -> HttpResponse:
    email = request.GET.get("email", "jane@example.org")
    send_mail("Welcome", f"Hello {email}, thanks for signing up.", None, [email])
    if request.GET.get("fail"):
        raise RuntimeError("something broke after send_mail(): the mail is not queued")
    return HttpResponse(f"queued a welcome mail to {email}\n")
