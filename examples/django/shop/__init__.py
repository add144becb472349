"""A one-view Django project that mails through mailspool."""
