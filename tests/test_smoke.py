"""Quick checks that the fixtures work end to end."""


def test_sql_set_get(conn, app):
    conn.execute("SELECT kvapi.kv_set('demo', 'greeting', '\"hello\"')")
    value, version, ttl = conn.execute("SELECT value, version, ttl FROM kvapi.kv_get('demo', 'greeting')").fetchone()
    assert value == "hello"
    assert ttl == 2592000


def test_http_put_get(client, http_app):
    response = client.put(f"/v1/{http_app.app_id}/kv/greeting", json={"value": "hello"})
    assert response.status_code == 200
    response = client.get(f"/v1/{http_app.app_id}/kv/greeting")
    assert response.status_code == 200
    assert response.json()["value"] == "hello"
