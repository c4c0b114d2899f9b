from django.contrib import admin
from django.urls import path

from django_workitems.health import health_view
from django_workitems.metrics import metrics_view
from django_workitems.schema import GraphQLView, schema

urlpatterns = [
    path("admin/", admin.site.urls),
    path("graphql/", GraphQLView.as_view(schema=schema, graphiql=True)),
    path("health/", health_view),
    path("metrics/", metrics_view),
]
