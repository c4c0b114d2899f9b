from django.contrib import admin
from django.urls import path
from django.views.generic import RedirectView

from django_workitems.health import health_view
from django_workitems.schema import GraphQLView

urlpatterns = [
    path("", RedirectView.as_view(url="/admin/", permanent=False)),
    path("admin/", admin.site.urls),
    # Log in through /admin/ first: the API needs the view_/change_ permissions. GraphiQL
    # sends the CSRF token itself, so CSRF protection stays on. django_workitems' view keeps the
    # depth limit and serves GraphiQL's assets locally (graphene_django_graphiql_static).
    path("graphql/", GraphQLView.as_view(graphiql=True)),
    # 200 while a worker heartbeats, 503 otherwise; details for staff only.
    path("health/", health_view),
]
